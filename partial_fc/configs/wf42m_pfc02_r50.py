# CosFace on WebFace42M (2,059,906 identities, 42.5M images) with an IResNet-50 and Partial FC sampling 20%
# of the class centers: arcface_torch's webface42m_r50_lr01_pfc02_bs4k_8gpus recipe. Assumes 8 GPUs with
# 32 GB or more each (batch 512 per GPU, 4,096 in all; lr 0.4 = 0.1 per 1,024) and the set at
# /train_tmp/WebFace42M. arcface_torch used DALI here; this trainer's loader needs more workers instead.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 512
config.lr = 0.4
config.verbose = 10000
config.dali = False
config.num_workers = 8

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
