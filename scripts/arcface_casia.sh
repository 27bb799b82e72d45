#!/usr/bin/env bash
# ArcFace (Deng et al., CVPR 2019): CASIA-WebFace + ResNet-50, LFW / CFP-FP / AgeDB-30 accuracy (%) of ArcFace,
# CosFace, SphereFace (m 1.35, combined margin), softmax and norm-softmax (s 64). Data: CASIA-WebFace with
# lfw.bin, cfp_fp.bin, agedb_30.bin (see dataset=casia). 5 runs of 32k iterations at batch 512.
# Extra arguments go to every job (e.g. trainer.device=cuda:1 dataset.root=/data/x trainer.epochs=2).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/arcface_casia/$(date +%Y-%m-%d_%H-%M-%S)
status=0

$ml train -m experiment=arcface_casia head=arcface,cosface,softmax hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=arcface_casia head=normface head.s=64 hydra.sweep.dir="$sweep" "$@" || status=1
$ml train -m experiment=arcface_casia head=combined head.m1=1.35 head.m2=0.0 head.m3=0.0 hydra.sweep.dir="$sweep" "$@" || status=1

$ml report "$sweep" || status=1
exit $status
