"""The realignment engine (Antidote): calibrate on harmful data, score every target weight, prune the top.

- `scores.py`: pure tensor math (statistics, scores, mask selection) and the tables of scores and
  granularities that the config, the dispatch and `--help` read;
- `calibrate.py`: hooks and one forward pass -> per-feature input statistics (summed in a fixed tree
  of chunks, so that data-parallel runs give the same bits);
- `targets.py`: which Linear layers are pruned;
- `config.py`: `RealignConfig`, one dataclass for the Python API, YAML and the CLI;
- `steps.py`: what both engines share: score -> select -> apply/restore one tensor at a time, checks,
  calibration data, output check, timer, `SweepResult`;
- `engine.py`: prepare -> calibrate -> for each ratio: mask, apply, save, restore;
- `reference.py`: the aligned model's weights for `--action revert`;
- `save.py`, `maskfile.py`: what is written (model or adapter, mask file, report, model card);
- `sequential.py`, `shards.py`: `--sequential`, one decoder block at a time from the safetensors files;
- `distributed.py`: data-parallel calibration under torchrun / accelerate launch (rank 0 writes).
"""
