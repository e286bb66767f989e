"""Layer 4, calibration: key steps chosen from errors measured on the model itself.

Recording plain generations and replaying them (:mod:`.propagation`), the error tables of every
cut (:mod:`.measure`), the exact optimiser (:mod:`.optimise`), the verified choice
(:mod:`.choice`), the saved result (:mod:`.data`, :class:`~fxprop.Calibration`), where the
generations come from (:mod:`.sources`) and the entry points (:mod:`.calibrate`). Its output
is data that makes a plan; nothing in the runtime depends on it.
"""
