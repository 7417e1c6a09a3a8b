"""The Locust users, one module per scenario (``overhead``, ``ratelimit``, ``payments``,
``mixed``, ``overload``), and what they share (``common``).

These modules import Locust, so only the Locust process the runner starts imports them
(``loadtests/locustfile.py``); this package's ``__init__`` imports none of them.
"""
