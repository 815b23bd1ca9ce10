"""The run store: one SQLite file of runs (``runs``: :class:`RunStore`), its schema as migration steps
(``schema``), how step columns are packed (``codec``) and the background writer (``writer``)."""
