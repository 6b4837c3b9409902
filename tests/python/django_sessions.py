"""Writes Django sessions into Redis the way a real Django app does, for tests/worker_django.rs.

Usage: django_sessions.py REDIS_URL SECRET_KEY
Prints one JSON object: the session keys / cookies it created.

- cache-backed sessions (SESSION_ENGINE = "django.contrib.sessions.backends.cache") stored by
  Django's built-in RedisCache: a logged-in user, an anonymous visitor, one that expires in 1 s;
- a signed-cookie session (SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies").
"""

import json
import sys

import django
from django.conf import settings

redis_url, secret = sys.argv[1], sys.argv[2]
settings.configure(
    SECRET_KEY=secret,
    CACHES={
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
        }
    },
    SESSION_ENGINE="django.contrib.sessions.backends.cache",
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions"],
    USE_TZ=True,
)
django.setup()

from django.contrib.sessions.backends.cache import SessionStore  # noqa: E402
from django.contrib.sessions.backends.signed_cookies import SessionStore as SignedStore  # noqa: E402

# What django.contrib.auth.login() stores for user pk 42.
user = SessionStore()
user["_auth_user_id"] = "42"
user["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
user["_auth_user_hash"] = "0" * 64
user["name"] = "Ann"
user["cart"] = [1, 2, 3]
user["visits"] = 5
user["ratio"] = 0.5
user["admin"] = False
user.save()

anon = SessionStore()
anon["visits"] = 1
anon.save()

expiring = SessionStore()
expiring["_auth_user_id"] = "5"
expiring.set_expiry(1)
expiring.save()

signed = SignedStore()
signed["_auth_user_id"] = "7"
signed["name"] = "Bo" * 40  # long enough for Django to compress it
signed.save()

# Read back through Django, to be sure these are what Django itself loads.
assert SessionStore(user.session_key).load()["_auth_user_id"] == "42"
assert SignedStore(signed.session_key).load()["_auth_user_id"] == "7"

print(
    json.dumps(
        {
            "user": user.session_key,
            "anon": anon.session_key,
            "expiring": expiring.session_key,
            "expiring_cache_key": expiring.cache_key,
            "signed_cookie": signed.session_key,
            "django": django.get_version(),
        }
    )
)
