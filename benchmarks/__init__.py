# SPDX-License-Identifier: Apache-2.0
"""Benchmarks of :class:`pyro_arm.TraceARM_ELBO`; run each as ``python -m benchmarks.<name>``."""
