"""Curvature of the loss at a checkpoint, one module per mathematical object (as curvlinops lays it out):

    samples     the seeded training subset, batches, eval mode (shared by the hessian and fim estimators)
    ggn         the exact Gauss-Newton-diagonal trace, and when it equals Tr(H)
    operators   the Hessian as a linear operator (curvlinops, pyhessian backends)
    taylor      quadratic forms v^T H v by one forward-mode second-order pass
    trace       Hutchinson and Hutch++ trace estimators
    spectrum    dense Hessian, top eigenvalues (eigsh), Lanczos, deflated SLQ (density and rank)

analyze.estimators.hessian is the estimator on top of them.
"""
