"""The application (layer 5): the pipeline runner, the run report and the ``spine1k`` command."""
