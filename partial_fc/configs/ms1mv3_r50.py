# ArcFace on MS1MV3 (93,431 identities, 5.18M images) with an IResNet-50: insightface arcface_torch's
# ms1mv3_r50 recipe (full softmax, sample_rate 1.0). Assumes 8 GPUs with 32 GB each (batch 128 per GPU,
# 1,024 in all) and the set unpacked to a fast local disk or tmpfs at /train_tmp/ms1m-retinaface-t1.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
