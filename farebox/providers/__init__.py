"""Provider adapters: one small class per wire format, plus the registry and the retry loop."""

from farebox.providers.base import ProviderAdapter, ProviderReply, ProviderRequest
from farebox.providers.registry import ProviderConfig, build_adapter, provider_configs
from farebox.providers.retry import call_with_retries

__all__ = [
    "ProviderAdapter",
    "ProviderConfig",
    "ProviderReply",
    "ProviderRequest",
    "build_adapter",
    "call_with_retries",
    "provider_configs",
]
