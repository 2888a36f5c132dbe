"""MkDocs hooks: the generated reference pages (``klsweep.site``) are written from the code on
every build and never stored, and MathJax's files come from its package (the ``docs`` extra)
into the site, so that a page's math renders with nothing loaded from elsewhere."""

from pathlib import Path

import mathjax
from mkdocs.structure.files import File

from klsweep.site import generated_pages

MATHJAX = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
# the TeX-to-HTML bundle, the fonts it loads beside it, and the TeX extensions it loads on use
MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")


def on_files(files, config):
    for path, write in generated_pages().items():
        files.append(File.generated(config, path, content=write()))
    for entry in MATHJAX_FILES:
        source = MATHJAX / entry
        for path in [source] if source.is_file() else sorted(source.rglob("*")):
            if path.is_file():
                files.append(File.generated(
                    config, f"assets/mathjax/{path.relative_to(MATHJAX).as_posix()}",
                    abs_src_path=str(path)))
    return files
