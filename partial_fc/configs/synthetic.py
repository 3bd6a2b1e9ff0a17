# The main job (`bash run.sh`): a narrow IResNet and the Partial FC head (half the centers sampled each
# step) trained on the generated face set `partial-fc make-synthetic --identities 400 --images-per-id 20
# --out data/synthetic` writes, verified on synthetic.bin (pairs of identities held out of training).
# Sized for 2 CPU ranks of a laptop-sized box: about 7 minutes to above 0.95 verification accuracy.
# Paths are relative to the working directory.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r10_nano"
config.resume = False
config.output = "work_dirs/synthetic"
config.embedding_size = 128
config.sample_rate = 0.5
config.fp16 = False
config.batch_size = 64
config.optimizer = "sgd"
config.lr = 0.05  # the rate the backbone had before the gradient-scale fix (0.1 averaged over 2 ranks)
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 50
config.frequent = 10
config.num_workers = 1
config.save_all_states = True

config.rec = "data/synthetic"
config.num_classes = 400
config.num_image = 400 * 20
config.num_epoch = 3
config.warmup_epoch = 1  # ArcFace from scratch needs it: without, this run stalls near 0.75-0.80
config.val_targets = ["synthetic"]
config.val_batch_size = 128
config.checkpoint_every = 0
config.keep_checkpoints = 2
