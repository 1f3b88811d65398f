"""(reserved for later kernel families)"""
