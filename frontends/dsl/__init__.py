"""r1c.frontends.dsl"""
