"""r1c.frontends.hf"""
