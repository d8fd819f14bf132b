#!/usr/bin/env python3
"""Import cycles between the crate's modules, from their `use crate::`, `crate::` and `super::`
paths (a module and its own parent or child do not count). Prints each pair of files that import
each other (CYCLE2), each strongly connected group of files (SCC) and each pair of top-level
modules that import each other (TOP); exits 1 when there is any. `-v` also prints every edge.
Usage: scripts/import-cycles.py [src] [-v]"""
import os,re,sys,itertools
args=[a for a in sys.argv[1:] if not a.startswith('-')]
root=args[0] if args else 'src'
mods={}
for d,_,fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs'): continue
        p=os.path.join(d,f); rel=os.path.relpath(p,root)[:-3].split('/')
        if rel[-1]=='mod': rel=rel[:-1]
        if rel in (['lib'],['main']): rel=[rel[0]]
        mods['::'.join(rel)]=p
def strip(s):
    s=re.sub(r'//[^\n]*','',s)
    return s
def expand(prefix,body):
    # expand use tree body like {a::b, c::{d,e}}
    out=[];depth=0;cur=''
    for ch in body:
        if ch=='{':depth+=1
        if ch=='}':depth-=1
        if ch==',' and depth==0: out.append(cur);cur=''
        else: cur+=ch
    out.append(cur);res=[]
    for it in out:
        it=it.strip()
        if not it: continue
        m=re.match(r'^([\w:]*?)::\{(.*)\}$',it,re.S)
        if m: res+=expand(prefix+[x for x in m.group(1).split('::') if x],m.group(2))
        elif it.startswith('{') : res+=expand(prefix,it[1:-1])
        else: res.append(prefix+[x for x in it.split(' as ')[0].strip().split('::') if x])
    return res
edges={}
for m,p in mods.items():
    s=strip(open(p).read())
    # cut test modules? keep
    paths=[]
    for u in re.finditer(r'use\s+crate::(\{.*?\}|[\w:]+(?:::\{[^;]*\})?)(?:\s+as\s+\w+)?\s*;',s,re.S):
        paths+=expand([],u.group(1))
    for u in re.finditer(r'(?<!use )(?<![\w:])crate::((?:\w+::)*\w+)',s):
        paths.append(u.group(1).split('::'))
    mine=m.split('::')
    for u in re.finditer(r'(?<![\w:])((?:super::)+)((?:\w+::)*\w+)',s):
        n=u.group(1).count('super::')
        base=mine[:-n] if not p.endswith('mod.rs') else mine[:len(mine)-n]
        if p.endswith('mod.rs') or p.endswith('lib.rs'): base=mine[:len(mine)-n]
        paths.append(base+u.group(2).split('::'))
    for path in paths:
        for k in range(len(path),0,-1):
            t='::'.join(path[:k])
            if t in mods:
                if t!=m and not m.startswith(t+'::') and not t.startswith(m+'::'):
                    edges.setdefault(m,set()).add(t)
                break
pairs=set()
for a,bs in edges.items():
    for b in bs:
        if a in edges.get(b,()) and (b,a) not in pairs: pairs.add((a,b))
for a,b in sorted(pairs): print('CYCLE2',a,'<->',b)
# SCCs
idx={};low={};st=[];on=set();res=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: res.append(comp)
for v in mods:
    if v not in idx: sc(v)
for comp in res: print('SCC',sorted(comp))
if '-v' in sys.argv:
    for a in sorted(edges): print(a,'->',sorted(edges[a]))
top={}
for a,bs in edges.items():
    for b in bs:
        ta,tb=a.split('::')[0],b.split('::')[0]
        if ta!=tb: top.setdefault((ta,tb),set()).add((a,b))
found=bool(pairs or res)
for (ta,tb),why in sorted(top.items()):
    if ta<tb and (tb,ta) in top:
        found=True
        print('TOP',ta,'<->',tb,':',sorted(why),'|',sorted(top[(tb,ta)]))
sys.exit(1 if found else 0)
