"""The README stays the quick path; the reference pages it points to exist and link correctly."""

import os
import re

from conftest import ROOT

PAGES = ["install.md", "demo.md", "layer.md", "language-models.md", "translation.md",
         "training.md", "distributed.md", "performance.md", "reliability.md", "compat.md"]


def read(path):
    return open(os.path.join(ROOT, path), encoding="utf-8").read()


def test_readme_is_short_and_points_to_every_reference_page():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 200
    for page in PAGES:
        assert f"(docs/{page})" in readme, page
        assert os.path.isfile(os.path.join(ROOT, "docs", page)), page
    index = read("docs/README.md")
    for page in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if page.endswith(".md") and page != "README.md":
            assert f"({page})" in index, page  # every page is listed in the index


def test_readme_mt_block_stops_and_saves_where_generate_reads():
    readme = read("README.md")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "translation" in b)
    assert "--max-update" in block
    save_dir = re.search(r"--save-dir (\S+)", block).group(1)
    assert f"--path {save_dir}/checkpoint_best.pt" in block
    assert "--model-overrides \"{'moe_k': 1}\"" in readme


def test_relative_links_resolve():
    files = ["README.md"] + [f"docs/{p}" for p in os.listdir(os.path.join(ROOT, "docs"))
                             if p.endswith(".md")]
    broken = []
    for name in files:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(name)):
            if not target.startswith("http") and not os.path.exists(
                    os.path.join(ROOT, os.path.dirname(name), target)):
                broken.append((name, target))
    assert not broken
