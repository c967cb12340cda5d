_base_ = ['../_base_/dvt_300e_in1k.py']
# The official repo has no training recipe for the DeiT-S variant; this uses DeiT-S's own (lr 5e-4 x 1024 / 512,
# weight decay 0.05, gradient clipping 5) with DVT's schedule.
model = dict(arch='deit-small')
train_dataloader = dict(batch_size=128)
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05), clip_grad=dict(max_norm=5.0))
