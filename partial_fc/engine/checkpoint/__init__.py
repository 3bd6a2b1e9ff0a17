"""Training checkpoints that survive crashes and changes of the number of ranks.

A checkpoint is the directory `<root>/step_<8-digit step>/`: `manifest.json` (written last), `backbone.pt`,
`backbone_optimizer.pt`, `training.pt` (step, epoch, scheduler, loss scaler, extra), one
`centers_<start>-<end>.pt` per rank (its rows of the class centers and of every per-row optimizer tensor)
and one `rank_<k>.pt` per rank (sampler position and RNG states). Every rank writes into
`<root>/.step_<N>.partial/` (which names its owner, see `run_lock`); rank 0 checks the files, writes the manifest
and renames the directory, so a kill at any point leaves the previous checkpoints whole, and a failed save
removes its own `.partial` folder and raises `CheckpointSaveError` on every rank. A checkpoint is newer when it
was saved later: each manifest holds a save `sequence` one above every checkpoint in the root, so after a resume
from an older checkpoint into the same root the new line's checkpoints win over the abandoned ones (pruning
goes by the same order). `<root>/latest` names the newest one for people and other tools; resume ignores it.

Loading on another number of ranks reads each new shard's rows from the overlapping saved shards only.
"""

from partial_fc.engine.checkpoint.errors import CheckpointError, CheckpointSaveError, CorruptCheckpointError
from partial_fc.engine.checkpoint.find import find_latest
from partial_fc.engine.checkpoint.load import TrainingState, load_checkpoint
from partial_fc.engine.checkpoint.manifest import backbone_weights_file
from partial_fc.engine.checkpoint.parts import TrainingParts
from partial_fc.engine.checkpoint.save import clean_leftovers, save_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "TrainingParts",
    "TrainingState",
    "backbone_weights_file",
    "clean_leftovers",
    "find_latest",
    "load_checkpoint",
    "save_checkpoint",
]
