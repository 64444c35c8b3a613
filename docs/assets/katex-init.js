// Typeset the math on each page with the vendored KaTeX (no network access needed).
// pymdownx.arithmatex (generic mode) leaves \( ... \) and \[ ... \] in the Markdown pages;
// the rendered notebooks keep Jupyter's $ ... $ and $$ ... $$. Code blocks are skipped.
function typesetMath(root) {
  renderMathInElement(root, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
      { left: "$", right: "$", display: false },
    ],
    ignoredClasses: ["highlight", "highlight-ipynb", "jp-InputArea-editor", "doc-signature"],
    throwOnError: false,
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(({ body }) => typesetMath(body));  // mkdocs-material: runs on every page load
} else {
  document.addEventListener("DOMContentLoaded", () => typesetMath(document.body));
}
