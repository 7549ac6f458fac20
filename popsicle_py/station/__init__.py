"""The duplicator station: slots, a web page, an HTTP API and a journal around ``watch``.

:mod:`slots` (the slot map), :mod:`journal` (SQLite records) and :mod:`recorder` (events to
rows), :mod:`board` (the page's state), :mod:`hub` (the session's thread to the server's
loop), :mod:`api` and :mod:`server` (aiohttp), :mod:`metrics`, :mod:`identify`,
:mod:`learn` (making a slot map) and :mod:`view` (the terminal).  The use case itself is
:mod:`popsicle_py.app.station`.
"""
