"""Stage 01_curation (notebook ``notebooks/01_curation.ipynb``): the sources become the release.

* :mod:`lib.stages.curation.stage` - the notebook's steps;
* :mod:`lib.stages.curation.config` - thresholds and configuration from the params;
* :mod:`lib.stages.curation.discover`, :mod:`.select`, :mod:`.convert`, :mod:`.release`, :mod:`.phi`.
"""

from lib.stages.context import print_environment
from lib.stages.curation.convert import conversion_time_summary
from lib.stages.curation.release import SplitFileError
from lib.stages.curation.stage import (
    STAGE,
    assign_split,
    audit,
    choose_series,
    convert_series,
    export,
    find_candidates,
    record,
    save_previews,
    save_quality_figure,
    start,
    write_outputs,
    write_table1,
)

__all__ = ["STAGE", "SplitFileError", "assign_split", "audit", "choose_series", "conversion_time_summary", "convert_series", "export",
           "find_candidates", "print_environment", "record", "save_previews", "save_quality_figure", "start",
           "write_outputs", "write_table1"]
