#!/usr/bin/env bash
# RBF-Softmax (Zhang et al., ECCV 2020): the 2-D MNIST feature figure, test accuracy (%) of softmax, center
# loss, cos-softmax (normface) and RBF-Softmax, 3 seeds, then the feature plots. Data: MNIST. 12 runs of 20 epochs.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/rbf_mnist_2d/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=rbf_mnist_2d head=softmax,normface,rbf seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=rbf_mnist_2d head=softmax regularizer=center seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1
$ml plot "$sweep" || status=1

$ml report "$sweep" || status=1
exit $status
