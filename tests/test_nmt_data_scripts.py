"""The translation data scripts refuse bad arguments and missing inputs with a message naming the fix
(the full pipelines are exercised by the recipes; they need minutes and, for WMT'14, GBs)."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_prepare_multi30k_rejects_unknown_pair(tmp_path):
    code, out = run_script("prepare-multi30k.sh", "--pair", "en-cs", "--out", str(tmp_path))
    assert code != 0 and "two of en, de, fr" in out


def test_prepare_multi30k_checks_its_source_folder(tmp_path):
    (tmp_path / "src").mkdir()
    code, out = run_script("prepare-multi30k.sh", "--src", str(tmp_path / "src"),
                           "--out", str(tmp_path / "out"))
    assert code != 0 and "missing" in out and "train.lc.norm.tok.en" in out


def test_shipped_multi30k_has_the_recipe_files():
    tok = os.path.join(ROOT, "data", "multi30k", "tok")
    for split in ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco"):
        for lang in ("en", "de", "fr"):
            assert os.path.isfile(os.path.join(tok, f"{split}.lc.norm.tok.{lang}.xz"))
    assert os.path.isfile(os.path.join(ROOT, "data", "multi30k", "README.md"))


def test_prepare_wmt14_needs_a_pair_and_names_missing_archives(tmp_path):
    code, out = run_script("prepare-wmt14.sh")
    assert code != 0 and "--pair en-de or --pair en-fr" in out
    code, out = run_script("prepare-wmt14.sh", "--pair", "en-de", "--archives", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--no-download")
    assert code != 0
    assert "training-parallel-europarl-v7.tgz" in out and "statmt.org" in out
