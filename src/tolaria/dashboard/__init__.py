"""``tolaria dashboard``: a local, read-only web app that follows runs and the academy live.

``cli`` is the command, ``app`` the Starlette application, ``guard`` what keeps it read-only
and local, ``pages`` the HTML (templates and scripts are package data files).  Starlette,
uvicorn and plotly are the ``dashboard`` extra: only this package imports them, and only
when the command runs.
"""
