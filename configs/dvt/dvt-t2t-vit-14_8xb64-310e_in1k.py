_base_ = ['../_base_/dvt_300e_in1k.py']
# Official command: 8 GPUs x 64, lr 5e-4, weight decay 0.05.
model = dict(arch='t2t-vit-14')
train_dataloader = dict(batch_size=64)
optim_wrapper = dict(optimizer=dict(lr=5e-4, weight_decay=0.05))
auto_scale_lr = dict(base_batch_size=512)
