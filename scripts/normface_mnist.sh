#!/usr/bin/env bash
# NormFace (Wang et al., ACM MM 2017): the MNIST 3-D feature figure, normalised softmax with s learned from 10,
# 3 seeds, then the feature plots. Data: MNIST (downloaded on first use). 3 runs of 53 epochs.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/normface_mnist/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=normface_mnist seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1
$ml plot "$sweep" || status=1

$ml report "$sweep" || status=1
exit $status
