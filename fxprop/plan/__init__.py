"""Layer 2, the plan: what runs at which step, decided before the sampling loop.

Key-step schedules (:mod:`.schedules`), forecast weights (:mod:`.forecast`), the plan of one
generation (:mod:`.plans`), prior noise (:mod:`.prior`) and the policies that make plans from
them (:mod:`.policies`). Imports only :mod:`fxprop.graph` (a policy names its cut).
"""
