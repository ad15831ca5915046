"""Shared service runtime for llmd."""
