#!/usr/bin/env bash
# NormFace (Wang et al., ACM MM 2017): LFW accuracy (%) of softmax and normalised softmax, each with and
# without center loss (the paper's table; its fine-tuned ResNet-28 is replaced by SphereFace-20 from scratch).
# Data: CASIA-WebFace + lfw.bin (see dataset=casia). 4 runs of ~3 GPU-hours.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/normface_casia/$(date +%Y-%m-%d_%H-%M-%S)
status=0

# NormFace's class weights train at lr x100 without decay (head.lr_mult / head.weight_decay in the experiment);
# the softmax baseline drops both: a plain softmax layer under the recipe's optimiser
softmax=(head=softmax "~head.lr_mult" "~head.weight_decay")
$ml train -m experiment=normface_casia "${softmax[@]}" hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=normface_casia head=normface hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=normface_casia "${softmax[@]}" regularizer=center hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=normface_casia head=normface regularizer=center hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
