# SPDX-License-Identifier: Apache-2.0
"""
The sigmoid-belief-net application built on :class:`~pyro_arm.TraceARM_ELBO`: binarized MNIST
(:mod:`~pyro_arm.sbn.data`), the ARM paper's models (:mod:`~pyro_arm.sbn.models`), training with
exact resume (:mod:`~pyro_arm.sbn.train`), test bounds (:mod:`~pyro_arm.sbn.evaluate`), figures
(:mod:`~pyro_arm.sbn.plots`) and the ``pyro-arm`` command (:mod:`~pyro_arm.sbn.cli`).

Nothing here is imported by :mod:`pyro_arm` itself, so the inference library needs only torch and
pyro-ppl; matplotlib is imported by :mod:`pyro_arm.sbn.plots` only (numpy and tqdm are
dependencies of pyro-ppl anyway).
"""
