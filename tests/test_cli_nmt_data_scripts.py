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


def test_prepare_multi30k_reruns_after_an_interruption(tmp_path):
    """A run interrupted in fairseq-preprocess leaves a partial bin/ without .done; the next run
    must finish (fairseq-preprocess refused it: FileExistsError on dict.en.txt). A synthetic
    corpus with Multi30k's line counts keeps it to seconds."""
    import random

    rng = random.Random(0)
    src = tmp_path / "src"
    src.mkdir()
    for split, lines in (("train", 29000), ("val", 1014), ("test_2016_flickr", 1000),
                         ("test_2017_flickr", 1000), ("test_2017_mscoco", 461)):
        for lang in ("en", "de"):
            words = [f"{lang}{i}" for i in range(12)]
            text = "".join(" ".join(rng.choices(words, k=3)) + "\n" for _ in range(lines))
            (src / f"{split}.lc.norm.tok.{lang}").write_text(text)
    out = tmp_path / "out"
    (out / "bin").mkdir(parents=True)
    (out / "bin" / "dict.en.txt").write_text("en1 5\n")  # what the interrupted run wrote
    code, text = run_script("prepare-multi30k.sh", "--src", str(src), "--out", str(out),
                            "--bpe-merges", "10", "--workers", "1")
    assert code == 0, text[-3000:]
    assert "FileExistsError" not in text and (out / "bin" / ".done").exists()
    assert (out / "bin" / "train.en-de.de.bin").stat().st_size > 0
    assert "en1 5" not in (out / "bin" / "dict.en.txt").read_text().splitlines()[:1]


def test_bpe_merges_must_be_a_positive_integer(tmp_path):
    for script, extra in (("prepare-multi30k.sh", []), ("prepare-wmt14.sh", ["--no-download"])):
        for value in ("abc", "0", "-5", "8k"):
            # checked while reading the arguments: before any extraction or download
            code, text = run_script(script, "--pair", "en-de", "--bpe-merges", value,
                                    "--out", str(tmp_path / "out"), *extra)
            assert code != 0 and text.strip().splitlines() == [
                f"[{script[:-3]}] error: --bpe-merges {value}: give a positive integer, the "
                f"number of BPE merge operations (e.g. --bpe-merges "
                f"{8000 if 'multi30k' in script else 32000})"], text
            assert not (tmp_path / "out").exists()


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


def test_prepare_wmt14_names_the_fix_for_a_corrupt_archive(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    for name in ("training-parallel-europarl-v7.tgz", "training-parallel-commoncrawl.tgz",
                 "training-parallel-nc-v9.tgz", "dev.tgz", "test-full.tgz"):
        (archives / name).write_bytes(b"not a tar archive\n" * 100)
    code, out = run_script("prepare-wmt14.sh", "--pair", "en-de", "--archives", str(archives),
                           "--out", str(tmp_path / "out"), "--no-download")
    assert code != 0
    line = next(line for line in out.splitlines() if "error:" in line)
    assert "training-parallel-europarl-v7.tgz is corrupt or truncated" in line
    assert "delete it and run again" in line
    assert not (tmp_path / "out" / "orig" / ".training-parallel-europarl-v7.tgz.done").exists()


def test_help_of_every_data_script_prints_its_usage_only(tmp_path):
    for name in sorted(os.listdir(os.path.join(ROOT, "scripts"))):
        if not (name.startswith("prepare-") and name.endswith(".sh")):
            continue
        proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", name), "--help"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stderr == "", (name, proc.stderr)
        lines = proc.stdout.splitlines()
        header = []
        for line in open(os.path.join(ROOT, "scripts", name)).read().splitlines()[1:]:
            if not line.startswith("#"):
                break
            header.append(line[2:] if line.startswith("# ") else line[1:])
        assert lines == header, name  # the comment block, without '#', and nothing after it
        assert not any(line.startswith(("set -", "root=", "source ")) for line in lines), name
        assert "bash scripts/" + name in proc.stdout, name  # it shows how to call it
