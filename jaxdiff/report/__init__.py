"""The report layer: the only code that draws figures or writes markdown.

It sits above the computing packages (analysis, fingerprint, heldout, pruning), which return
objects; each module here writes one page from them. `figures` holds the figure primitives and
`save_figure`, the one atomic PNG writer; `tables` the one markdown table writer and the number
formats; `analysis`, `heldout`, `fingerprint`, `pruning`, `study` the pages.
"""
