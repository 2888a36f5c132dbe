// MathJax 3 for pymdownx.arithmatex (generic mode): typeset \( \) and \[ \] inside the
// elements arithmatex marks, once, when the page loads. (Material's instant loading is off in
// mkdocs.yml, so every page is a full load; with it on, each page change would need a fresh
// typeset.)
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
    enableMenu: false,
  },
};
