"""lookalike studio: the whole study in the browser (photos, training jobs with live curves, comparison, trying
and sharing), on the same functions and files as the command line: a job is `lookalike train` run as `lookalike
sweep` runs it, and every page reads the workspace's own files, so a run started in a terminal shows there too."""
