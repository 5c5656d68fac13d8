"""Training recipes: scripts that make what the package ships, run from the repository root.

They are not part of the installed library; see ``recipes/README.md``.
"""
