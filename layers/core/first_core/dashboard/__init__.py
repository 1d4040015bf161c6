"""The dashboard's logic (the routes are `chalicelib/dashboard.py` and `chalicelib/admin.py`):
`sessions` (the signed session cookie, the sign-in's state, CSRF), `signin` (Globus's
authorization code with PKCE through globus-sdk), `history` (a user's requests, the admins'
request log) and `activity` (the admins' figures). Everything here reads what the request
path already writes: the dashboard adds no write to it."""
