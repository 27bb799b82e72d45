#!/usr/bin/env bash
# RBF-Softmax (Zhang et al., ECCV 2020) on CIFAR-10: softmax vs RBF-Softmax (s 35, gamma 16) with ResNet-20,
# 3 seeds. The paper's CIFAR table could not be read: no published number to compare. Data: CIFAR-10.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/rbf_cifar10/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=rbf_cifar10 head=softmax,rbf seed=0,1,2 hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
