"""DNS layer: the shared cached resolver, DNSBL lookups, sender-domain existence."""
from .resolver import DnsAnswer, Resolver, ResolverStats, Status
from .settings import DnsblSettings, DnsblZone, DomainSettings, ResolverSettings

__all__ = ["DnsAnswer", "DnsblSettings", "DnsblZone", "DomainSettings", "Resolver",
           "ResolverSettings", "ResolverStats", "Status"]
