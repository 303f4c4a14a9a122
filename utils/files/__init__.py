"""Files on disk: checkpoints loaded safely and saved atomically (`state_dicts`, `checkpoint_formats`),
the ingredients of a range (`ingredients`), a soup with its recipe and sidecars (`soup_io`), results lines
(`results`), MEHL's resume state (`mehl_state`) and the lock of an output (`lock`). Builds on
utils.runtime only."""
