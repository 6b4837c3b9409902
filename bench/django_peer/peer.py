"""Django Channels 4 doing what Switchyard's reference consumers do, for side-by-side benchmarks.

/ws/echo/          echoes every frame unchanged (text or binary)
/ws/relay/<room>/  relays every text frame to the group relay-<room>, sender included
/                  a small HTTP response

Run: REDIS_URL=redis://127.0.0.1:6379/0 daphne -b 127.0.0.1 -p 8001 peer:application
(with this directory on PYTHONPATH). The layer settings raise
redis-py 8's pool cap and socket timeout, which would otherwise measure errors, not Channels.
"""
import os
from urllib.parse import urlparse

import django
from django.conf import settings

redis = urlparse(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-only",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["channels"],
    ASGI_APPLICATION="peer.application",
    CHANNEL_LAYERS={
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{
                    "host": redis.hostname or "127.0.0.1",
                    "port": redis.port or 6379,
                    "db": int((redis.path or "/0").lstrip("/") or 0),
                    "max_connections": 10000,
                    "socket_timeout": None,
                }],
                "prefix": os.environ.get("PEER_PREFIX", "peer"),
            },
        }
    },
)
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path, re_path  # noqa: E402


class Echo(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=text_data, bytes_data=bytes_data)


class Relay(AsyncWebsocketConsumer):
    async def connect(self):
        self.group = "relay-" + self.scope["url_route"]["kwargs"]["room"]
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        await self.channel_layer.group_send(self.group, {"type": "relay.text", "text": text_data})

    async def relay_text(self, event):
        await self.send(text_data=event["text"])


def hello(request):
    return HttpResponse(b"hello from django channels\n", content_type="text/plain")


urlpatterns = [path("", hello)]
application = ProtocolTypeRouter({
    "http": get_asgi_application(),
    "websocket": URLRouter([
        re_path(r"^ws/echo/$", Echo.as_asgi()),
        re_path(r"^ws/relay/(?P<room>[\w-]+)/$", Relay.as_asgi()),
    ]),
})
