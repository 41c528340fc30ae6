"""MkDocs hook: the repository's generated results and reference READMEs become pages of the site.

They are written by `make bench`, `make fewlabels`, `make faults`... into `benchmarks/`, and live beside
the files they describe (`deploy/`, `model_repository/`); copying them into `docs/` would make a second
copy of every figure. Added here under their repository paths, so docs link to `benchmarks/results.md`.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
INCLUDED = (
    "benchmarks/**/*.md",
    "benchmarks/**/*.png",
    "benchmarks/**/*.json",
    "deploy/README.md",
    "model_repository/README.md",
)


# Pages that live outside docs/ link to the docs as the repository lays them out (`../docs/serving.md`,
# right on GitHub); on the site the docs are at the root.
REPOSITORY_LINK = re.compile(r"\]\(\.\./docs/")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if not page.file.src_uri.startswith(("deploy/", "model_repository/")):
        return markdown
    return REPOSITORY_LINK.sub("](../", markdown)


def on_files(files: Files, config) -> Files:
    for pattern in INCLUDED:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File(str(path.relative_to(ROOT)), str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
