#!/usr/bin/env bash
# The CPU-sized reproduction: 2-D features of softmax, L-Softmax, SphereFace, AM-Softmax, ArcFace, center loss
# and RBF-Softmax on the embedded 8x8 digits (LeNet++ with a 2-D embedding, 15 epochs, 3 seeds each), then the
# table (report.md / report.csv) and the features side by side (features_grid.png). No download; about
# 10 minutes on 2 CPU cores. The per-head settings below fit a 2-D feature and a ~350-step run (see
# marginlab/configs/experiment/digits_2d_comparison.yaml).
# Extra arguments go to every job (e.g. trainer.epochs=5 for a quick look).
# MARGINLAB="python -m marginlab" runs it from a checkout. Exit status 1 when a job failed (see the report).
set -uo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # these tiny nets train ~3x faster on one thread than on two
ml=${MARGINLAB:-marginlab}
sweep=${MARGINLAB_OUTPUT_DIR:-outputs}/sweeps/digits_2d_comparison/$(date +%Y-%m-%d_%H-%M-%S)
status=0
common=(experiment=digits_2d_comparison seed=0,1,2 hydra.sweep.dir="$sweep")

$ml train -m "${common[@]}" head=softmax,rbf "$@" || status=1
$ml train -m "${common[@]}" head=softmax regularizer=center regularizer.center.weight=0.01 "$@" || status=1
$ml train -m "${common[@]}" head=lsoftmax head.gamma=1e-3 "$@" || status=1
$ml train -m "${common[@]}" head=sphereface head.gamma=0.5 "$@" || status=1
$ml train -m "${common[@]}" head=amsoftmax s=10 m=0.1 "$@" || status=1
$ml train -m "${common[@]}" head=arcface s=10 m=0.2 "$@" || status=1

$ml report "$sweep" || status=1
$ml plot "$sweep" || status=1
exit $status
