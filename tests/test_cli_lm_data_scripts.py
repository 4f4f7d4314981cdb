"""scripts/prepare-{wikitext2,ptb,lm1b}.sh: clear errors on missing or damaged input, and the
1B Word layout binarized end to end (on a fake, tiny copy of the official folder tree)."""

import lzma
import os
import re
import subprocess

import pytest
from conftest import ROOT


def run_script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", name), *map(str, args)],
                            capture_output=True, text=True, timeout=180, env=env)
    return result.returncode, result.stdout + result.stderr


def test_wikitext2_rejects_a_damaged_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = lzma.open(os.path.join(ROOT, "data", "wikitext-2", "wiki.valid.tokens.xz")).read()
    (src / "wiki.valid.tokens").write_bytes(good.replace(b" the ", b" teh ", 1))  # same line count
    (src / "wiki.train.tokens.xz").write_bytes(b"not xz at all")
    rc, out = run_script("prepare-wikitext2.sh", "--src", src, "--out", tmp_path / "out")
    assert rc == 1 and "corrupt or truncated" in out and "wiki.train.tokens.xz" in out
    (src / "wiki.train.tokens.xz").unlink()
    (src / "wiki.train.tokens").write_text("too short\n")
    rc, out = run_script("prepare-wikitext2.sh", "--src", src, "--out", tmp_path / "out")
    assert rc == 1 and "has 1 lines, expected 36718" in out


def test_wikitext2_on_a_full_disk_names_the_folder_and_its_free_space(tmp_path):
    """A write that fails (no space) is not reported as a corrupt archive. The output goes to a
    64 KiB tmpfs where this user may mount one (root); elsewhere the first output file is made a
    link to /dev/full, whose writes fail with ENOSPC alike."""
    out = tmp_path / "out"
    raw = out / "raw"
    raw.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(raw)],
                             capture_output=True).returncode == 0
    try:
        if not mounted:
            os.symlink("/dev/full", raw / "train.tokens.tmp")
        rc, text = run_script("prepare-wikitext2.sh", "--out", out)
    finally:
        if mounted:
            subprocess.run(["umount", str(raw)], check=True)
    line = next((line for line in text.splitlines() if "] error:" in line), text)
    assert rc == 1 and "corrupt" not in line, text
    assert f"cannot write {raw / 'train.tokens.tmp'} (" in line and "No space left" in line
    assert re.search(rf"{re.escape(str(raw))} has \S+ free \(df -h ", line), line
    assert "give --out a folder on a disk with room" in line


def test_wikitext2_checks_sha256(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    train = lzma.open(os.path.join(ROOT, "data", "wikitext-2", "wiki.train.tokens.xz")).read()
    (src / "wiki.train.tokens").write_bytes(train.replace(b" the ", b" teh ", 1))
    rc, out = run_script("prepare-wikitext2.sh", "--src", src, "--out", tmp_path / "out")
    assert rc == 1 and "sha256" in out and "differs from the published" in out


def test_ptb_and_lm1b_name_the_missing_input(tmp_path):
    rc, out = run_script("prepare-ptb.sh", "--src", tmp_path, "--out", tmp_path / "out")
    assert rc == 1 and "missing" in out and "ptb.train.txt" in out
    rc, out = run_script("prepare-lm1b.sh", "--src", tmp_path, "--out", tmp_path / "out")
    assert rc == 1 and "training-monolingual.tokenized.shuffled" in out
    rc, out = run_script("prepare-lm1b.sh", "--archive", tmp_path / "none.tar.gz", "--out", tmp_path / "o")
    assert rc == 1 and "no such archive" in out
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    rc, out = run_script("prepare-lm1b.sh", "--archive", broken, "--out", tmp_path / "o2")
    assert rc == 1 and "corrupt or truncated" in out


@pytest.mark.slow
def test_lm1b_layout_is_binarized_with_the_count_3_vocabulary(tmp_path):
    tree = tmp_path / "1-billion-word-language-modeling-benchmark-r13output"
    train_dir = tree / "training-monolingual.tokenized.shuffled"
    heldout_dir = tree / "heldout-monolingual.tokenized.shuffled"
    train_dir.mkdir(parents=True)
    heldout_dir.mkdir()
    (train_dir / "news.en-00001-of-00100").write_text("the cat sat .\nthe dog sat .\nrare once .\n")
    (train_dir / "news.en-00002-of-00100").write_text("the cat ran .\ntwice twice .\n")
    (heldout_dir / "news.en.heldout-00000-of-00050").write_text("the cat sat .\n")
    (heldout_dir / "news.en.heldout-00001-of-00050").write_text("the dog ran .\n")
    rc, out = run_script("prepare-lm1b.sh", "--src", tree, "--out", tmp_path / "out",
                         "--max-train-shards", 2, "--workers", 1)
    assert rc == 0, out
    words = [line.split()[0] for line in (tmp_path / "out" / "bin" / "dict.txt").read_text().splitlines()
             if not line.startswith("madeupword")]
    assert sorted(words) == [".", "the"]  # count >= 3: "the" (4), "." (5); "cat" (2) and "twice" (2) not
    for split in ("train", "valid", "test"):
        assert (tmp_path / "out" / "bin" / f"{split}.bin").exists()
    assert "vocabulary: 2 words" in out
    rc, out = run_script("prepare-lm1b.sh", "--src", tree, "--out", tmp_path / "out", "--max-train-shards", 2)
    assert rc == 0 and "already prepared" in out
    # another configuration is never silently served from the old binaries
    rc, out = run_script("prepare-lm1b.sh", "--src", tree, "--out", tmp_path / "out", "--max-train-shards", 3)
    assert rc == 1 and "missing or empty training shard" in out and "00003" in out
