#!/usr/bin/env bash
# RBF-Softmax (Zhang et al., ECCV 2020): ImageNet top-1 (%) of ResNet-50, softmax vs RBF-Softmax (100 epochs,
# cosine lr 0.2, batch 256; the report compares the best epoch's top-1, the statistic the paper reports).
# Data: ILSVRC-2012 in dataset.root (see dataset=imagenet). ~2 x 2 GPU-days.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/rbf_imagenet/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=rbf_imagenet head=softmax,rbf hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
