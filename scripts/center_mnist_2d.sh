#!/usr/bin/env bash
# Center loss (Wen et al., ECCV 2016): the 2-D MNIST feature figure for lambda = 0 (softmax), 0.001, 0.01,
# 0.1, then the feature plots side by side. Data: MNIST (downloaded on first use). 4 runs of 21 epochs.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/center_mnist_2d/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=center_mnist_2d regularizer.center.weight=0,0.001,0.01,0.1 hydra.sweep.dir="$sweep" "$@" || status=1
$ml plot "$sweep" || status=1

$ml report "$sweep" || status=1
exit $status
