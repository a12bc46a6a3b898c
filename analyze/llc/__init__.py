"""The LLC's machinery: the SGLD sampler (`sampler`), estimates and diagnostics from its traces (`statistics`),
the step's stability at a checkpoint (`stability`), the devinterp reference adapter (`devinterp`) and
`analyze calibrate` (`calibrate`). The estimator itself is analyze/estimators/llc.py."""
