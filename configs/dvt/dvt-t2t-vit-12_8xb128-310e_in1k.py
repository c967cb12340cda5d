_base_ = ['../_base_/dvt_300e_in1k.py']
# Official command: 8 GPUs x 128, lr 2e-3, weight decay 0.03.
model = dict(arch='t2t-vit-12')
train_dataloader = dict(batch_size=128)
optim_wrapper = dict(optimizer=dict(lr=2e-3, weight_decay=0.03))
