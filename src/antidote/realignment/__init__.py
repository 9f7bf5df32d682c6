"""The realignment engine (Antidote): calibrate on harmful data, score every target weight, prune the top.

- `scores.py`: pure tensor math (statistics, scores, mask selection) and the tables of scores and
  granularities that the config, the dispatch and `--help` read;
- `calibrate.py`: hooks and one forward pass -> per-feature input statistics;
- `targets.py`: which Linear layers are pruned;
- `config.py`: `RealignConfig`, one dataclass for the Python API, YAML and the CLI;
- `engine.py`: prepare -> calibrate -> for each ratio: mask, apply, save, restore;
- `reference.py`: the aligned model's weights for `--action revert`;
- `save.py`, `maskfile.py`: what is written (model or adapter, mask file, report, model card).
"""
