# CosFace on Glint360K (360,232 identities, 17.1M images) with an IResNet-100 and Partial FC sampling 10%
# of the class centers per step. Assumes 8 GPUs with 32 GB each (batch 128 per GPU, 1,024 in all) and the
# set at /train_tmp/glint360k.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.1
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
