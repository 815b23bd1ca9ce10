"""Live runs: every training process serves its run on a local endpoint; clients attach, watch and steer.

``protocol`` (frames and the token handshake), ``connection`` (connection files), ``endpoint`` and
``source`` (the serving side), ``client`` and ``run`` (the watching side: one Run interface),
``serve`` (serving an engine or a tracked loop), ``steer`` (finding a run from what a person types),
``worker`` and ``child`` (the app's training processes), ``forkserver`` (which forks them warm).
"""
