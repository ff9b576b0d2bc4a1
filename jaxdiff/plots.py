"""Old home of the figure primitives, kept so `from jaxdiff import plots` still works.

They live in `jaxdiff.report.figures` (the report layer); patch that module, not this one.
"""

from jaxdiff.report.figures import (KINDS, gallery, heatmap, manhattan_figure, manhattan_plot,
                                    reliability_plot, save_figure, scree_plot, spread_plot)
