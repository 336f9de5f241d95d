"""Evaluation: Go/No-Go (D-12), stage criteria and OptimizationAdvisor (D-14), reports and plots (D-9).

Import from the submodules (`pillsnap.evaluate.go_no_go`, `.criteria`, `.advisor`, `.reports`, `.plots`).
"""
