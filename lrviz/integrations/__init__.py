"""Callbacks that record and steer the trainers people use, each a thin layer over :func:`lrviz.track`.

- ``lrviz.integrations.lightning.LrvizCallback``: Lightning 2.x (``pip install 'lrviz[lightning]'``)
- ``lrviz.integrations.transformers.LrvizCallback``: Hugging Face ``Trainer``
  (``pip install 'lrviz[transformers]'``)

Importing this package imports neither library; each module says what to install when its library is absent.
"""
